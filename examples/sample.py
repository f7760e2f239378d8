"""Sample an image grid from a saved DDPM pipeline (a local folder or a Hub repo id).

    python examples/sample.py outputs/ddpm-digits --num_images 16 --steps 1000 --out samples.png

Without a model it builds a small untrained network, which shows the plumbing (noise in, images out).
"""

import argparse
import math

import torch
from diffusers.utils import make_image_grid

from ddpm_hf import DDPMPipeline, DDPMScheduler, UNet2DModel


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="Saved pipeline folder or Hub repo id (default: an untrained demo model).")
    parser.add_argument("--num_images", type=int, default=16, help="How many images to sample.")
    parser.add_argument("--steps", type=int, default=1000, help="Number of denoising steps.")
    parser.add_argument("--seed", type=int, default=0, help="Random seed (same seed, same images).")
    parser.add_argument("--out", default="samples.png", help="Where to write the grid PNG.")
    return parser.parse_args()


def demo_pipeline() -> DDPMPipeline:
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler())


def main() -> None:
    args = parse_args()
    pipe = DDPMPipeline.from_pretrained(args.model) if args.model else demo_pipeline()
    images = pipe(batch_size=args.num_images, num_inference_steps=args.steps,
                  generator=torch.Generator().manual_seed(args.seed)).images
    cols = math.ceil(math.sqrt(args.num_images))
    rows = math.ceil(args.num_images / cols)
    images += [images[0].copy().point(lambda _: 0)] * (rows * cols - len(images))  # pad the last row
    make_image_grid(images, rows=rows, cols=cols).save(args.out)
    print(f"Wrote {args.num_images} samples to {args.out}")


if __name__ == "__main__":
    main()
