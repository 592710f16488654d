"""What XLA says of a compiled program: FLOPs, bytes, memory, collectives, and a roofline.

For the benchmarks, on any backend (a CPU mesh, or a TPU slice compiled ahead of time by libtpu
on a host without TPUs). No TensorFlow here.
"""
import re

import numpy as np

COLLECTIVES = ('all-gather', 'all-reduce', 'all-to-all', 'collective-permute', 'reduce-scatter')
ITEMSIZE = dict(pred=1, s8=1, u8=1, s16=2, u16=2, f16=2, bf16=2, s32=4, u32=4, f32=4, s64=8,
                u64=8, f64=8)


def cost(compiled) -> dict:
  """{'flops', 'bytes'} of one call, per device for an SPMD program (XLA's cost analysis)."""
  c = compiled.cost_analysis()
  c = c[0] if isinstance(c, (list, tuple)) else c
  return dict(flops=float(c.get('flops', np.nan)), bytes=float(c.get('bytes accessed', np.nan)))


def memory(compiled) -> dict:
  """Bytes per device: arguments, outputs, temporaries, and the peak estimate arguments + temp
  (+ outputs that do not reuse a donated argument)."""
  m = compiled.memory_analysis()
  out = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
             temp=m.temp_size_in_bytes, aliased=m.alias_size_in_bytes)
  out['peak'] = out['arguments'] + out['temp'] + out['outputs'] - out['aliased']
  return out


def collectives(hlo_text: str, image_size: int) -> dict:
  """Bytes per device of the collectives of an SPMD-partitioned HLO module, by kind: 'views'
  (an image batch [n, S, S, 3]: the key shuffle), 'all-reduce' (gradients, metrics) and
  'other'. An op counts its per-device result (an all-gather's output, an all-reduce's buffers;
  an async start's result, which holds its operand too). A channel id counts once: the TPU
  compiler copies one collective into each of the fusions it overlaps with (59 on v5e)."""
  op_re = re.compile(r'=\s*(.*?)\s(' + '|'.join(COLLECTIVES) + r')(-start)?\(')
  shape_re = re.compile(r'\b(' + '|'.join(ITEMSIZE) + r')\[([\d,]*)\]')
  out = {'views': 0, 'all-reduce': 0, 'other': 0}
  seen = set()
  for line in hlo_text.splitlines():
    match = op_re.search(line)
    if not match:
      continue
    channel = re.search(r'channel_id=(\d+)', line)
    if channel:
      if channel.group(1) in seen:
        continue
      seen.add(channel.group(1))
    shapes = [(t, [int(d) for d in dims.split(',') if d])
              for t, dims in shape_re.findall(match.group(1))]
    nbytes = sum(int(np.prod(dims)) * ITEMSIZE[t] for t, dims in shapes)
    if any(dims[1:] == [image_size, image_size, 3] for _, dims in shapes):
      out['views'] += nbytes
    elif match.group(2) == 'all-reduce':
      out['all-reduce'] += nbytes
    else:
      out['other'] += nbytes
  return out


def roofline(flops: float, nbytes: float, peak_flops: float, bandwidth: float):
  """(seconds, bound): the larger of compute time at peak and memory time at full bandwidth."""
  compute, mem = flops / peak_flops, nbytes / bandwidth
  return (compute, 'compute') if compute >= mem else (mem, 'memory')
