"""One DDP process for test_torch_ddp.py: ``python torch_ddp_worker.py RANK WORLD PORT OUT``.

Trains one step of a small model (kernrnn.torch.LSTM and kernrnn.torch.Recurrent
inside DistributedDataParallel, gloo backend) on its shard of a fixed batch and
saves the averaged gradients to OUT (.npz).
"""

import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import kernrnn.torch as kt

BATCH = 4  # the whole batch; each of WORLD ranks takes BATCH / WORLD sequences


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = kt.LSTM(3, 4, num_layers=2, batch_first=True, dtype=torch.float64)
        self.gru = kt.Recurrent("gru", 4, 3, bidirectional=True, batch_first=True,
                                dtype=torch.float64)
        self.head = nn.Linear(6, 1, dtype=torch.float64)

    def forward(self, x):
        y, _ = self.lstm(x)
        y, _ = self.gru(y)
        return self.head(y).square().mean()


def data():
    g = torch.Generator().manual_seed(123)
    return torch.randn(BATCH, 5, 3, generator=g, dtype=torch.float64)


def main(rank, world, port, out):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Model()
    x = data()
    if world == 1:  # the single-process reference on the whole batch
        model(x).backward()
    else:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        ddp = nn.parallel.DistributedDataParallel(model)
        shard = x.chunk(world)[rank]
        ddp(shard).backward()  # DDP averages the shards' gradients
    np.savez(out, **{n: p.grad.numpy() for n, p in model.named_parameters()})
    if world > 1:
        dist.barrier()  # neither rank tears down while the other still talks to it
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    # Gloo's C++ threads can abort the process in interpreter finalisation
    # ("terminate called without an active exception", SIGABRT; seen once in CI,
    # an upstream teardown race). The results are on disk and the group is
    # destroyed, so leave without finalisation.
    sys.stdout.flush()
    os._exit(0)
