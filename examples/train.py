"""Train a DDPM with ddpm_hf. Every flag is a field of ddpm_hf.training.TrainingConfig or DataConfig.

With no flags: the `tiny` UNet on the embedded 16 px digits, on the CPU, in a few minutes; the
pipeline and a sample grid (samples.png) land in outputs/ddpm-digits.

  python examples/train.py                                   # one process (CPU or one GPU)
  accelerate launch --multi_gpu --num_processes 4 examples/train.py ...  # 4 GPUs (DDP)
  ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/train.py ...  # 2 CPU processes

On a CPU, start one process with plain `python` (or `accelerate launch --num_processes 1`): `accelerate
launch --cpu` limits each process to one thread (OMP_NUM_THREADS=1), which halves the speed.

Exit status: 0 when training finished (or had finished: resuming a finished run does nothing), or when
SIGTERM/SIGINT stopped it after saving a checkpoint (continue with --resume_from_checkpoint latest); 1 when
the loss became NaN/inf, a checkpoint or the pipeline could not be written (disk full), or the Hub refused
the upload (the saved files are intact: retry with `ddpm-hf push`); 2 for bad input or an output_dir that
another live run holds, before any training. The same command line, with --resume_from_checkpoint latest,
can be rerun after any failure or kill.
"""

import logging
import sys

from ddpm_hf.hub import HubPushError
from ddpm_hf.training import (LaunchError, NonFiniteLossError, OutputDirLockedError, WriteFailedError, parse_args,
                              train)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv, description=__doc__)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint messages
    try:
        train(config)
    except (NonFiniteLossError, WriteFailedError, HubPushError) as error:
        logging.getLogger("train").error(str(error))
        return 1
    except (ValueError, OSError, ImportError, LaunchError, OutputDirLockedError) as error:  # before training starts
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
