r"""The side-by-side reference: a PyTorch MoCo v2 train step with AMP on the same GPU.

Written from the paper and the reference's `moco/builder.py` (query and key ResNet-50 with the
2048-2048-128 MLP head, momentum 0.999, queue 65536, tau 0.2, SGD lr 0.03 x batch / 256, momentum
0.9, weight decay 1e-4), in mixed precision (torch.autocast bf16 or fp16 + GradScaler), on
synthetic finished views (no input pipeline, as `benchmarks/throughput.py`'s step row). On one GPU
the reference's shuffled BN is a no-op (one group); ours keeps `moco.bn_groups`.

  python benchmarks/torch_moco_step.py --batch=256 --steps=20    # needs torch + torchvision

Prints `torch-moco-step <gpu> batch B <dtype>: X img/s, peak memory Y GiB`.
"""
import argparse
import copy
import time

import torch
import torch.nn.functional as F
import torchvision


class MoCo(torch.nn.Module):
  def __init__(self, dim=128, queue=65536, momentum=0.999, tau=0.2):
    super().__init__()
    self.m, self.tau = momentum, tau
    self.q = torchvision.models.resnet50(num_classes=dim)
    hidden = self.q.fc.weight.shape[1]
    self.q.fc = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), self.q.fc)
    self.k = copy.deepcopy(self.q)
    for p in self.k.parameters():
      p.requires_grad = False
    self.register_buffer('queue', F.normalize(torch.randn(dim, queue), dim=0))
    self.register_buffer('ptr', torch.zeros(1, dtype=torch.long))

  def forward(self, x1, x2):
    q = F.normalize(self.q(x1), dim=1)
    with torch.no_grad():
      for pq, pk in zip(self.q.parameters(), self.k.parameters()):
        pk.mul_(self.m).add_(pq.detach(), alpha=1 - self.m)
      k = F.normalize(self.k(x2), dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue.clone().detach()], 1)
    loss = F.cross_entropy(logits.float() / self.tau,
                           torch.zeros(len(q), dtype=torch.long, device=q.device))
    with torch.no_grad():
      n, p = len(k), int(self.ptr)
      self.queue[:, p:p + n] = k.T.to(self.queue.dtype)
      self.ptr[0] = (p + n) % self.queue.shape[1]
    return loss


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float16'])
  args = parser.parse_args()
  dev = torch.device('cuda')
  torch.backends.cudnn.benchmark = True
  model = MoCo().to(dev).to(memory_format=torch.channels_last)
  opt = torch.optim.SGD(model.q.parameters(), lr=0.03 * args.batch / 256, momentum=0.9,
                        weight_decay=1e-4)
  dtype = getattr(torch, args.dtype)
  scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
  x1, x2 = (torch.randn(args.batch, 3, args.image_size, args.image_size, device=dev)
            .to(memory_format=torch.channels_last) for _ in range(2))

  def step():
    with torch.autocast('cuda', dtype=dtype):
      loss = model(x1, x2)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss

  for _ in range(3):
    step()
  torch.cuda.synchronize()
  torch.cuda.reset_peak_memory_stats()
  tick = time.perf_counter()
  for _ in range(args.steps):
    loss = step()
  torch.cuda.synchronize()
  rate = args.batch * args.steps / (time.perf_counter() - tick)
  peak = torch.cuda.max_memory_allocated() / 2**30
  print(f'torch-moco-step {torch.cuda.get_device_name()} batch {args.batch} {args.dtype} AMP: '
        f'{rate:.0f} img/s, peak memory {peak:.1f} GiB (loss {float(loss.detach()):.3f})')


if __name__ == '__main__':
  main()
