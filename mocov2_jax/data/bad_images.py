"""The tally of unreadable examples (no TensorFlow here: the loop's experiments hold one)."""
import numpy as np
from absl import logging

MAX_NAMED = 5   # unreadable examples named in the log (all are counted)
NAME_BYTES = 1024   # a name is cut to this many bytes when the processes pool their names


class BadImages:
  """Unreadable examples met so far (`data.on_bad_image='skip'`): counted, the first few named."""

  def __init__(self):
    self.count, self.names = 0, []

  def add(self, names):
    for name in names:
      self.count += 1
      if len(self.names) < MAX_NAMED:
        self.names.append(name)
        logging.warning('Skipped an unreadable image: %s (%d so far)', name, self.count)


def over_processes(bad: BadImages):
  """(count, names) of every process's `bad` together: counts summed, the first MAX_NAMED names
  in process order. A collective: every process must call it at the same point."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return bad.count, list(bad.names)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  names = np.zeros((MAX_NAMED, NAME_BYTES), np.uint8)
  for i, name in enumerate(bad.names[:MAX_NAMED]):
    data = str(name).encode()[:NAME_BYTES]
    names[i, :len(data)] = np.frombuffer(data, np.uint8)
  counts, names = multihost_utils.process_allgather((np.int32(bad.count), names))
  pooled = [bytes(row).rstrip(b'\0').decode(errors='replace') for row in
            np.asarray(names).reshape(-1, NAME_BYTES) if row.any()]
  return int(np.sum(counts)), pooled[:MAX_NAMED]
