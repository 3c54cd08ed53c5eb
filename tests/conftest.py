import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

# Tiny test models gain nothing from intra-op threads, and thread hand-offs dominate their run time.
torch.set_num_threads(1)
