"""The workdir of every program, on etils.epath (local folders, gs://, any fsspec URL):

  WORKDIR/config.json       the resolved config of the run (earlier ones kept as config.N.json)
  WORKDIR/checkpoints/<s>   orbax checkpoints of the train state at step s
  WORKDIR/results.json      what the run measured

This is the one module that makes orbax CheckpointManagers and restores checkpoints.
"""
import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


def path(workdir) -> epath.Path:
  """Local folders made absolute (orbax wants that); URLs such as gs://bucket/run as they are."""
  p = epath.Path(workdir)
  return p if '://' in str(workdir) else epath.Path(p.resolve())


def write_config(config, workdir):
  (path(workdir) / 'config.json').write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir):
  """The config.json a run wrote into `workdir`, or None."""
  p = path(workdir) / 'config.json'
  return ml_collections.ConfigDict(json.loads(p.read_text())) if p.exists() else None


def keep_previous_config(workdir):
  """Moves config.json aside to the first free config.N.json (a resumed run with a new config)."""
  p = path(workdir) / 'config.json'
  n = 1
  while (path(workdir) / f'config.{n}.json').exists():
    n += 1
  (path(workdir) / f'config.{n}.json').write_text(p.read_text())


def read_results(workdir) -> dict:
  p = path(workdir) / 'results.json'
  return json.loads(p.read_text()) if p.exists() else {}


def write_results(workdir, results):
  (path(workdir) / 'results.json').write_text(json.dumps(results, indent=2))


def manager(workdir, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(path(workdir) / 'checkpoints',
                               options=ocp.CheckpointManagerOptions(max_to_keep=keep))


def save(mgr, state, *, force=False):
  """Saves `state` at its step (unless saved already) and waits until it is on disk."""
  step = int(state.step)
  if mgr.latest_step() != step:
    mgr.save(step, args=ocp.args.StandardSave(state), force=force)
  mgr.wait_until_finished()


def restore_latest(mgr, like):
  """`like` (a train state of the right shapes and shardings) restored from the latest step."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  return mgr.restore(mgr.latest_step(), args=ocp.args.StandardRestore(abstract))


def find(checkpoint) -> tuple[epath.Path, epath.Path]:
  """(step dir, workdir) of a workdir (its latest step) or of one WORKDIR/checkpoints/<step>."""
  p = path(checkpoint)
  if not p.is_dir():
    raise FileNotFoundError(f'{p} does not exist: pass a pre-training workdir or one of its '
                            'checkpoints/<step> folders')
  if p.name.isdigit() and p.parent.name == 'checkpoints':
    return p, p.parent.parent
  ckdir = p / 'checkpoints'
  steps = [int(d.name) for d in ckdir.iterdir() if d.name.isdigit()] if ckdir.is_dir() else []
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {ckdir}: has pre-training saved one yet?')
  return ckdir / str(max(steps)), p


def _item(step_dir) -> epath.Path:
  return epath.Path(step_dir) / 'default'   # CheckpointManager's name for a single item


def saved_tree(step_dir):
  """The saved train state's tree as shape-only metadata (reads no arrays)."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    return handler.metadata(_item(step_dir)).tree
  except (FileNotFoundError, ValueError, OSError) as e:
    raise ValueError(f'{step_dir} is not a readable checkpoint ({type(e).__name__}: {e})') from e
  finally:
    handler.close()


def restore_raw(step_dir) -> dict:
  """The saved train state as nested dicts of NumPy arrays: no model, no target tree and no
  devices (the saving run's device layout need not exist here)."""
  tree = saved_tree(step_dir)
  handler = ocp.PyTreeCheckpointHandler()
  try:
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return handler.restore(_item(step_dir), args=ocp.args.PyTreeRestore(restore_args=args))
  finally:
    handler.close()


def _flat(tree, prefix=''):
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f'{prefix}{k}.') if isinstance(v, dict) else {f'{prefix}{k}': v})
  return out


def config_changes(workdir, config) -> dict:
  """{dotted field: (saved, new)} between the workdir's config.json and `config` ({} if none)."""
  p = path(workdir) / 'config.json'
  if not p.exists():
    return {}
  old = _flat(json.loads(p.read_text()))
  new = _flat(json.loads(config.to_json_best_effort()))
  return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
          if old.get(k) != new.get(k)}


def check_resume(workdir, config, fixed):
  """Before a run resumes `workdir`: refuses a change of a field that shapes the state or the
  method (`fixed`: dotted names or prefixes such as 'model.'), returns the other changes."""
  ckdir = path(workdir) / 'checkpoints'
  if not (ckdir.is_dir() and any(d.name.isdigit() for d in ckdir.iterdir())):
    return {}
  changes = config_changes(workdir, config)
  refused = {k: v for k, v in changes.items()
             if any(k == f or (f.endswith('.') and k.startswith(f)) for f in fixed)}
  if refused:
    raise ValueError(f'{workdir} holds a run with another ' + ', '.join(
        f'{k} (saved {old!r}, now {new!r})' for k, (old, new) in refused.items())
        + ': its checkpoints cannot continue with this config: use a new --workdir, or the '
        'saved values.')
  return changes


def check_workdir(workdir):
  """A clear error, before anything is written, for a workdir that is a file or not writable."""
  p = path(workdir)
  if '://' in str(workdir):
    return   # remote: the first write tells
  if p.exists() and not p.is_dir():
    raise ValueError(f'--workdir={workdir} is a file, not a folder: pass a folder.')
  existing = p
  while not existing.exists():
    existing = existing.parent
  if not os.access(existing, os.W_OK):
    raise ValueError(f'--workdir={workdir}: {existing} is not writable: pass a folder you can '
                     'write to.')
