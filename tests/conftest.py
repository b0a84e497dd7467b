"""Suite-wide settings: one intra-op thread, since the tests' tensors are tiny and two OpenMP threads
waiting on each other on a busy machine made them up to 15x slower (the commands the tests start as
subprocesses keep their own defaults)."""

import torch

torch.set_num_threads(1)
