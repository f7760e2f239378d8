"""Sample an image grid from a saved DDPM pipeline (a local folder or a Hub repo id): the Python API in a few lines.

    python examples/sample.py outputs/ddpm-digits --num_images 16 --out samples.png
    python examples/sample.py outputs/ddpm-digits --fast    # bf16 autocast, channels_last, torch.compile

The `ddpm-hf sample` command does the same and more (other schedulers, folders of PNGs, the denoising GIF).
"""

import argparse

import torch

from ddpm_hf import DDPMPipeline
from ddpm_hf.visualization import make_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a saved pipeline folder (a training run's --output_dir) or a Hub repo id")
    parser.add_argument("--num_images", type=int, default=16, help="how many images to sample (default: 16)")
    parser.add_argument("--steps", type=int, default=1000, help="denoising steps (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same images (default: 0)")
    parser.add_argument("--fast", action="store_true", help="pipe.enable_fast_sampling(): the first call compiles")
    parser.add_argument("--out", default="samples.png", help="where to write the grid (default: samples.png)")
    args = parser.parse_args()

    pipe = DDPMPipeline.from_pretrained(args.model)
    if args.fast:
        pipe.enable_fast_sampling()
    images = pipe(batch_size=args.num_images, num_inference_steps=args.steps,
                  generator=torch.Generator().manual_seed(args.seed)).images
    make_grid(images).save(args.out)
    print(f"Wrote {args.num_images} samples to {args.out}")


if __name__ == "__main__":
    main()
