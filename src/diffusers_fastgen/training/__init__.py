from .accelerate_setup import (
    Accumulator,
    check_replicas_in_sync,
    make_optimizer,
    peak_rss_mb,
    run_main,
    setup_accelerator,
    training_state_mb,
    update,
)
from .args import (
    AdversarialArgs,
    EMAArgs,
    LoRAArgs,
    OptimizerArgs,
    RunArgs,
    TextToImageArgs,
    TextToVideoArgs,
    build,
    check_pipeline_folder,
    parse_args,
    save_config,
    to_flat_dict,
)
from .checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from .nonfinite import NonFiniteError, NonFiniteGuard, check_finite
from .validation import log_image_grid, make_grid, save_image_grid
