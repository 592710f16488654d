"""xla_stats: reading collectives out of compiled HLO text (the benchmarks' byte counts)."""
from mocov2_jax import xla_stats


def test_collective_bytes_by_kind():
  """xla_stats' HLO reading (the benchmarks'): the image batch (the key shuffle) apart from the
  gradient all-reduce, an async start counted once (its result holds the operand too), and a
  channel id once (the TPU compiler's copies of one collective in the fusions around it)."""
  hlo = """
  %all-gather = u8[16,64,64,3]{3,2,1,0} all-gather(%param.75), channel_id=4, dimensions={0}
  %all-gather.7 = u8[16,64,64,3]{3,2,1,0} all-gather(%param.76), channel_id=4, dimensions={0}
  %all-gather.1 = s32[16]{0} all-gather(%perm), channel_id=5, dimensions={0}
  %all-reduce.2 = (f32[8]{0}, f32[3,3,64,64]{3,2,1,0}) all-reduce(%g0, %g1), channel_id=6
  %ag-start = (f32[2,64,64,3]{3,2,1,0}, f32[16,64,64,3]{3,2,1,0}) all-gather-start(%x)
  %ag-done = f32[16,64,64,3]{3,2,1,0} all-gather-done(%ag-start)"""
  image = 64 * 64 * 3
  assert xla_stats.collectives(hlo, 64) == {
      'views': 16 * image + 18 * image * 4, 'all-reduce': (8 + 9 * 64 * 64) * 4, 'other': 64}
