r"""Sets finished runs beside the paper: Tables 1 and 2 (and the CIFAR-10 Table 2) in Markdown.

  python -m mocov2_jax.report LINEAR_WORKDIR [LINEAR_WORKDIR ...]

Each argument is a finished linear-evaluation workdir (its results.json). The row it reproduces
comes from its pre-training's config.json (`paper.table`, `paper.row`, set by configs/table*.py);
the epochs and batch shown are those the pre-training actually ran. Rows with no run are shown as
not run, never filled in; a workdir that cannot be read is refused with the reason.
"""
import json
import sys

from absl import app
from etils import epath

from mocov2_jax import paper


class ReportError(ValueError):
  pass


def _json(path, what):
  if not path.exists():
    raise ReportError(f'{path} not found: {what}')
  try:
    data = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ReportError(f'{path} is not valid JSON ({e})') from e
  if not isinstance(data, dict):
    raise ReportError(f'{path} holds a {type(data).__name__}, not a JSON object')
  return data


def _number(d, key, path):
  v = d.get(key)
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    raise ReportError(f'{path}: "{key}" is {v!r}, not a number')
  return float(v)


def read_run(workdir) -> dict:
  """One finished linear evaluation and the pre-training it evaluated."""
  path = epath.Path(workdir) / 'results.json'
  lin = _json(path, 'not a finished linear-evaluation workdir')
  top1, top5 = _number(lin, 'top1', path), _number(lin, 'top5', path)
  ckpt = lin.get('checkpoint')
  if not isinstance(ckpt, dict) or not isinstance(ckpt.get('path'), str):
    raise ReportError(f'{path}: no "checkpoint": {{"path": ...}}: not a linear-evaluation '
                      'result (a pre-training workdir? evaluate it with mocov2_jax.linear_eval)')
  pre_dir = epath.Path(ckpt['path']).parent.parent
  cfg_path = pre_dir / 'config.json'
  cfg = _json(cfg_path, f'the pre-training config of {workdir} (which row it reproduces)')
  pre_results = pre_dir / 'results.json'
  pre = _json(pre_results, '') if pre_results.exists() else {}  # epochs and kNN, if any
  label, data, model = (cfg.get(k) or {} for k in ('paper', 'data', 'model'))
  data_name = str(data.get('name', '?')) + (' (folder)' if data.get('folder') else '')
  return dict(
      workdir=workdir, table=str(label.get('table') or ''), row=str(label.get('row') or ''),
      top1=top1, top5=top5, mode=lin.get('mode', '?'), method=cfg.get('method', 'moco'),
      batch=cfg.get('batch_size'), epochs_planned=cfg.get('num_epochs'),
      epochs=pre.get('epochs'), knn=pre.get('knn_top1'),
      data=data_name, arch=f"{model.get('arch', '?')}/{model.get('width', '?')}")


def _fmt(x, digits=1):
  return '-' if x is None else f'{x:.{digits}f}'


def _epochs(run):
  e, planned = run['epochs'], run['epochs_planned']
  if e is None:
    return '?'
  e = f'{e:g}'
  return e if planned is None or float(e) == planned else f'{e} (of {planned})'


HEADER = ('| row | setting | paper | ours | diff | kNN | epochs run | batch | encoder | data | '
          'linear | workdir |\n|---|---|---|---|---|---|---|---|---|---|---|---|')


def table(table_id, runs) -> str:
  title, rows = paper.TABLES[table_id]
  lines = [f'### {title}', '', HEADER]
  for row, (setting, ref) in rows.items():
    mine = [r for r in runs if r['table'] == table_id and r['row'] == row]
    if not mine:
      lines.append(f'| {row} | {setting} | {_fmt(ref)} | not run | | | | | | | | |')
    for r in mine:
      diff = '-' if ref is None else f"{r['top1'] - ref:+.1f}"
      lines.append(f"| {row} | {setting} | {_fmt(ref)} | {r['top1']:.2f} | {diff} | "
                   f"{_fmt(r['knn'], 2)} | {_epochs(r)} | {r['batch']} | {r['arch']} | "
                   f"{r['data']} | {r['mode']} | {r['workdir']} |")
  return '\n'.join(lines)


def report(workdirs) -> str:
  runs = [read_run(w) for w in workdirs]
  known = {(t, row) for t, (_, rows) in paper.TABLES.items() for row in rows}
  out = [table('1', runs), table('2', runs)]
  if any(r['table'] == '2-cifar10' for r in runs):
    out.append(table('2-cifar10', runs))
  other = [r for r in runs if (r['table'], r['row']) not in known]
  if other:
    lines = ['### Runs of no paper row', '', '| workdir | method | top-1 | kNN | epochs run | '
             'batch | encoder | data |', '|---|---|---|---|---|---|---|---|']
    lines += [f"| {r['workdir']} | {r['method']} | {r['top1']:.2f} | {_fmt(r['knn'], 2)} | "
              f"{_epochs(r)} | {r['batch']} | {r['arch']} | {r['data']} |" for r in other]
    out.append('\n'.join(lines))
  out.append('ours: linear top-1 (%); diff: ours - paper; kNN: the pre-training\'s monitor '
             '(k 200) at its end; linear: protocol or fast (cached features).')
  return '\n\n'.join(out) + '\n'


def main(argv):
  """argv[1:]: the linear-evaluation workdirs. Exit 2 (bad input) with the reason when one is
  unreadable."""
  if len(argv) < 2:
    raise app.UsageError('pass one or more linear-evaluation workdirs')
  try:
    sys.stdout.write(report(argv[1:]))
  except ReportError as e:
    print(f'report: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  app.run(main)
