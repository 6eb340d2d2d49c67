import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Tiny-model timings on the shared 2-core box are steady only with one intra-op thread.
torch.set_num_threads(1)
