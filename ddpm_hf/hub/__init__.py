"""The Hugging Face Hub: model cards, and a push that uploads a saved pipeline with its card and samples.

```py
>>> from ddpm_hf.hub import push_to_hub, write_model_card
>>> write_model_card("outputs/ddpm-digits")                       # README.md from the run's own records
>>> push_to_hub("outputs/ddpm-digits", "alice/ddpm-digits")       # the same, from the command line:
>>> # ddpm-hf push outputs/ddpm-digits alice/ddpm-digits
```
"""

from .card import (
    EVAL_RESULTS_FILE,
    is_generated_card,
    read_training_metadata,
    render_model_card,
    sample_images,
    write_model_card,
)
from .push import HubPushError, check_can_push, check_saved_pipeline, create_hub_repo, files_to_upload, push_to_hub

__all__ = [
    "EVAL_RESULTS_FILE",
    "HubPushError",
    "check_can_push",
    "check_saved_pipeline",
    "create_hub_repo",
    "files_to_upload",
    "is_generated_card",
    "push_to_hub",
    "read_training_metadata",
    "render_model_card",
    "sample_images",
    "write_model_card",
]
