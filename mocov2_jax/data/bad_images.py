"""The tally of unreadable examples (no TensorFlow here: the loop's experiments hold one)."""
from absl import logging

MAX_NAMED = 5   # unreadable examples named in the log (all are counted)


class BadImages:
  """Unreadable examples met so far (`data.on_bad_image='skip'`): counted, the first few named."""

  def __init__(self):
    self.count, self.names, self._seen = 0, [], set()

  def add(self, names):
    """Counts each example once, however many epochs meet it."""
    for name in names:
      if name in self._seen:
        continue
      self._seen.add(name)
      self.count += 1
      if len(self.names) < MAX_NAMED:
        self.names.append(name)
        logging.warning('Skipped an unreadable image: %s (%d so far)', name, self.count)
