"""The tally of unreadable examples (no TensorFlow here: the loop's experiments hold one)."""
import hashlib

import numpy as np
from absl import logging

MAX_NAMED = 5   # unreadable examples named in the log (all are counted)
NAME_BYTES = 1024   # a name is cut to this many bytes when the processes pool their names


class BadImages:
  """Unreadable examples met so far (`data.on_bad_image='skip'`): counted, the first few named."""

  def __init__(self):
    self.count, self.names, self._seen = 0, [], set()   # _seen: the names' 64-bit digests

  def add(self, names):
    """Counts each example once, however many epochs meet it."""
    for name in names:
      digest = _digest(name)
      if digest in self._seen:
        continue
      self._seen.add(digest)
      self.count += 1
      if len(self.names) < MAX_NAMED:
        self.names.append(name)
        logging.warning('Skipped an unreadable image: %s (%d so far)', name, self.count)

  def restore(self, names, digests):
    """Adds a resumed run's tally, from what results.json kept (`over_processes`): the examples
    met before the stop are not counted again."""
    self._seen |= {tuple(int(x) for x in d) for d in digests}
    self.count = len(self._seen)
    self.names = list(dict.fromkeys([*names, *self.names]))[:MAX_NAMED]


def _digest(name) -> tuple:
  """A name as 2 int32 (64 bits of its BLAKE2b hash)."""
  return tuple(np.frombuffer(hashlib.blake2b(str(name).encode(), digest_size=8).digest(),
                             np.int32).tolist())


def over_processes(bad: BadImages):
  """(count, names, digests) of every process's `bad` together: each unreadable example counted
  once, whichever processes met it, and the first MAX_NAMED names in process order. A collective:
  every process must call it at the same point."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return bad.count, list(bad.names), sorted(bad._seen)   # pylint: disable=protected-access
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gather = multihost_utils.process_allgather
  longest = max(1, int(np.max(gather(np.int32(len(bad._seen))))))
  digests = np.zeros((longest, 3), np.int32)   # (met, 64-bit hash) rows
  for i, digest in enumerate(sorted(bad._seen)):
    digests[i] = (1, *digest)
  names = np.zeros((MAX_NAMED, NAME_BYTES), np.uint8)
  for i, name in enumerate(bad.names[:MAX_NAMED]):
    data = str(name).encode()[:NAME_BYTES]
    names[i, :len(data)] = np.frombuffer(data, np.uint8)
  digests, names = (np.asarray(x) for x in gather((digests, names)))
  met = {tuple(int(x) for x in row[1:]) for row in digests.reshape(-1, 3) if row[0]}   # JSON
  pooled = []
  for row in names.reshape(-1, NAME_BYTES):
    name = bytes(row).rstrip(b'\0').decode(errors='replace')
    if name and name not in pooled:
      pooled.append(name)
  return len(met), pooled[:MAX_NAMED], sorted(met)
