"""The pictures every DDPM tutorial draws: sample grids, the denoising process, the forward noising process.

```py
>>> from ddpm_hf.visualization import DenoisingRecorder, forward_process_strip, make_grid
>>> recorder = DenoisingRecorder(timesteps=[999, 800, 600, 400, 200, 0])
>>> images = pipe(batch_size=8, callback_on_step_end=recorder).images
>>> make_grid(images).save("samples.png")
>>> recorder.save_gif("denoising.gif")  # one frame per snapshot, each a grid of the batch
>>> recorder.strip().save("denoising.png")  # a row per image, a column per snapshot
>>> forward_process_strip(images[0], pipe.scheduler).save("noising.png")  # q(x_t | x_0) at a few t
```

Small images (the 16 px digits) are enlarged with nearest-neighbour sampling until each is at least
`MIN_CELL` pixels a side, so that the pixels stay visible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import PIL.Image
import torch
from diffusers.utils import make_image_grid
from PIL import ImageDraw

MIN_CELL = 64  # smallest side, in pixels, of one image in a grid, strip or GIF frame
_LABEL_HEIGHT = 14  # height of the band of timestep labels above a strip
NOISING_FRACTIONS = (0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1)  # default columns of the forward-process strip, as t / T
Images = Sequence[PIL.Image.Image] | torch.Tensor


def to_pil(images: Images) -> list[PIL.Image.Image]:
    """PIL images from PIL images, or from a `(B, C, H, W)` tensor: uint8, or float in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        return list(images)
    if images.dtype != torch.uint8:
        images = (images.float() * 255).round().clamp(0, 255).to(torch.uint8)
    arrays = images.cpu().permute(0, 2, 3, 1).numpy()  # (B, H, W, C)
    return [PIL.Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array) for array in arrays]


def enlarge(image: PIL.Image.Image, min_cell: int = MIN_CELL) -> PIL.Image.Image:
    """Scale up by the smallest integer factor that makes both sides at least `min_cell` (nearest neighbour)."""
    scale = max(1, math.ceil(min_cell / min(image.size)))
    return image if scale == 1 else image.resize((image.width * scale, image.height * scale), PIL.Image.NEAREST)


def make_grid(images: Images, cols: int | None = None, min_cell: int = MIN_CELL) -> PIL.Image.Image:
    """The images in rows of `cols` (default: as square as possible), the last row padded with black.

    A wrapper around `diffusers.utils.make_image_grid`, which needs exactly `rows * cols` images.
    """
    images = [enlarge(image, min_cell) for image in to_pil(images)]
    if not images:
        raise ValueError("No images to put in a grid.")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    images += [PIL.Image.new(images[0].mode, images[0].size)] * (rows * cols - len(images))
    return make_image_grid(images, rows=rows, cols=cols)


def labelled_strip(columns: Sequence[Images], labels: Sequence[str], min_cell: int = MIN_CELL) -> PIL.Image.Image:
    """A grid whose column j holds the images of `columns[j]` (one row per image), with `labels[j]` above it."""
    num_rows = len(to_pil(columns[0]))
    by_row = [to_pil(column) for column in columns]
    grid = make_grid([by_row[col][row] for row in range(num_rows) for col in range(len(columns))],
                     cols=len(columns), min_cell=min_cell)
    strip = PIL.Image.new("RGB", (grid.width, grid.height + _LABEL_HEIGHT))
    strip.paste(grid, (0, _LABEL_HEIGHT))
    draw, cell_width = ImageDraw.Draw(strip), grid.width // len(columns)
    for col, label in enumerate(labels):
        draw.text((col * cell_width + 2, 1), label, fill="white")
    return strip


@dataclass
class Snapshot:
    """The batch at one moment of the denoising process."""

    timestep: int  # the timestep of the denoising step just taken
    images: torch.Tensor  # uint8 (B, C, H, W)


class DenoisingRecorder:
    r"""
    A `callback_on_step_end` for [`DDPMPipeline`] that keeps snapshots of the denoising process.

    After each chosen step it stores the new sample x_{t-1} (or, with `key="pred_original_sample"`, the
    model's estimate of x_0 at that step) as uint8 images. Each call of the pipeline starts a new recording.

    Args:
        timesteps (`Sequence[int]`, *optional*): Record after the steps whose timesteps are nearest to these
            (e.g. `[999, 750, 500, 250, 0]`); with fewer inference steps, the nearest ones of the schedule.
        num_frames (`int`, defaults to 40): Without `timesteps`, this many evenly spaced steps, the last included.
        key (`"sample"` or `"pred_original_sample"`): What to record.

    Example:

    ```py
    >>> recorder = DenoisingRecorder(num_frames=20)
    >>> pipe(batch_size=16, num_inference_steps=1000, callback_on_step_end=recorder)
    >>> recorder.save_gif("denoising.gif")
    ```
    """

    def __init__(
        self,
        timesteps: Sequence[int] | None = None,
        num_frames: int = 40,
        key: Literal["sample", "pred_original_sample"] = "sample",
    ):
        if num_frames < 1:
            raise ValueError(f"num_frames must be positive, got {num_frames}.")
        self.timesteps = None if timesteps is None else [int(t) for t in timesteps]
        self.num_frames = num_frames
        self.key = key
        self.snapshots: list[Snapshot] = []
        self._steps_to_keep: set[int] = set()

    def __call__(self, pipe, step_index: int, timestep: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        if step_index == 0:
            self.snapshots = []
            self._steps_to_keep = self.choose_steps(pipe.scheduler.timesteps)
        if step_index in self._steps_to_keep:
            if self.key not in state:
                raise ValueError(f"The scheduler {type(pipe.scheduler).__name__} does not return {self.key!r}.")
            images = (pipe.postprocess(state[self.key], "pt") * 255).round().to(torch.uint8).cpu()
            self.snapshots.append(Snapshot(int(timestep), images))

    def choose_steps(self, schedule: torch.Tensor) -> set[int]:
        """The step indices of `schedule` (the timesteps, in sampling order) to record."""
        schedule = np.asarray(schedule.cpu(), dtype=np.int64)
        if self.timesteps is None:
            return set(np.linspace(0, len(schedule) - 1, min(self.num_frames, len(schedule))).round().astype(int))
        return {int(np.abs(schedule - t).argmin()) for t in self.timesteps}

    def save_gif(self, path: str | Path, cols: int | None = None, frame_ms: int = 80, final_ms: int = 2000):
        """An animated GIF, one frame per snapshot (each a grid of the batch), the last one held for `final_ms`."""
        if not self.snapshots:
            raise ValueError("Nothing recorded: pass the recorder as callback_on_step_end to the pipeline first.")
        frames = [make_grid(snapshot.images, cols) for snapshot in self.snapshots]
        durations = [frame_ms] * (len(frames) - 1) + [final_ms]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)

    def strip(self, max_images: int | None = 8) -> PIL.Image.Image:
        """The snapshots side by side, labelled with their timesteps: a row per image (the first `max_images`)."""
        if not self.snapshots:
            raise ValueError("Nothing recorded: pass the recorder as callback_on_step_end to the pipeline first.")
        columns = [snapshot.images[:max_images] for snapshot in self.snapshots]
        return labelled_strip(columns, [f"t={snapshot.timestep}" for snapshot in self.snapshots])


def forward_process_strip(
    image: PIL.Image.Image,
    scheduler,
    timesteps: Sequence[int] | None = None,
    seed: int = 0,
) -> PIL.Image.Image:
    """The forward process q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) of one image, at `timesteps`.

    Every column uses the same noise, drawn from `seed`, through the scheduler's `add_noise`, so the strip
    shows the signal fading as alpha_bar_t falls. Labelled with the timesteps; by default 0, 5%, 10%, 20%,
    30%, 50%, 70% and 100% of the way to T (0, 50, 100, 200, 300, 500, 700, 999 for T = 1000).
    """
    num_train_timesteps = scheduler.config.num_train_timesteps
    if timesteps is None:
        timesteps = [round(fraction * (num_train_timesteps - 1)) for fraction in NOISING_FRACTIONS]
    image = image.convert("L" if image.mode in ("1", "L", "LA", "I", "F") else "RGB")
    pixels = torch.from_numpy(np.array(image, dtype=np.float32) / 127.5 - 1)  # (H, W) or (H, W, C) in [-1, 1]
    x0 = (pixels[None, None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)[None])  # (1, C, H, W)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    if not all(0 <= t < num_train_timesteps for t in timesteps):
        raise ValueError(f"Timesteps must lie in [0, {num_train_timesteps - 1}], got {list(timesteps)}.")
    noisy = [scheduler.add_noise(x0, noise, torch.tensor([t])) for t in timesteps]
    columns = [((x_t + 1) / 2).clamp(0, 1) for x_t in noisy]
    return labelled_strip(columns, [f"t={t}" for t in timesteps])
