r"""Does the offline demo learn on every seed? Runs the README's demo command once per seed and
device count, and prints one table: kNN top-1 (k=200, backbone) at random init and at the end,
the gain in points, wall time and the run's CPU time (user + system, children included).

  python benchmarks/demo_seeds.py --workdir=/tmp/demo_seeds                 # seeds 0-4 x 1 device,
                                                                            # seeds 0-1 x 8 devices
  python benchmarks/demo_seeds.py --workdir=/tmp/demo_seeds --runs=0:1,3:8 -- --config.num_epochs=5

`--runs` is a comma-separated list of SEED:DEVICES; DEVICES > 1 runs with
XLA_FLAGS=--xla_force_host_platform_device_count=DEVICES (the same global batch on fake CPU
devices). Everything after `--` goes to every run as config overrides. A run whose workdir
already holds a results.json with both numbers is reported, not run again (delete it to rerun).
A benchmark, not a test: about 6 minutes a run on 2 idle CPU cores (docs/results.md).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RUNS = '0:1,1:1,2:1,3:1,4:1,0:8,1:8'


def cpu_seconds():
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def run_one(workdir, seed, devices, overrides, log):
  results_path = os.path.join(workdir, 'results.json')
  wall = cpu = None
  if not os.path.exists(results_path):
    env = dict(os.environ)
    if devices > 1:
      env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                          f' --xla_force_host_platform_device_count={devices}').strip()
    cmd = [sys.executable, '-m', 'mocov2_jax.main', f'--config={REPO}/configs/demo.py',
           f'--workdir={workdir}', f'--config.seed={seed}', *overrides]
    print(f'$ {"XLA_FLAGS=" + env["XLA_FLAGS"] + " " if devices > 1 else ""}{" ".join(cmd)}',
          flush=True)
    start, cpu0 = time.time(), cpu_seconds()
    with open(log, 'w') as f:
      proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=f, text=True)
    wall, cpu = time.time() - start, cpu_seconds() - cpu0
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ''
    print(f'  {last or "(no output; log: " + log + ")"}  [{wall / 60:.1f} min]', flush=True)
    if proc.returncode != 0:
      print(f'  exit {proc.returncode}; log: {log}', flush=True)
      return None
  results = json.load(open(results_path))
  return results.get('knn_top1_init'), results.get('knn_top1'), wall, cpu


def minutes(s):
  return '(earlier run)' if s is None else f'{int(s // 60)}m{int(s % 60):02d}s'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='one sub-folder per run')
  parser.add_argument('--runs', default=DEFAULT_RUNS, help='SEED:DEVICES,... (default: %(default)s)')
  args, overrides = parser.parse_known_args()
  overrides = [o for o in overrides if o != '--']
  os.makedirs(args.workdir, exist_ok=True)
  rows = []
  for item in args.runs.split(','):
    seed, devices = (int(x) for x in item.split(':'))
    name = f'seed{seed}_dev{devices}'
    out = run_one(os.path.join(args.workdir, name), seed, devices, overrides,
                  os.path.join(args.workdir, name + '.log'))
    rows.append((seed, devices, out))

  print('\n| seed | devices | kNN at init | kNN after training | gain (points) | wall | CPU time |')
  print('|---|---|---|---|---|---|---|')
  gains = []
  for seed, devices, out in rows:
    if out is None or None in out[:2]:
      print(f'| {seed} | {devices} | failed | | | | |')
      continue
    init, final, wall, cpu = out
    gains.append(final - init)
    print(f'| {seed} | {devices} | {init:.2f} | {final:.2f} | {final - init:+.1f} | '
          f'{minutes(wall)} | {minutes(cpu)} |')
  if gains:
    print(f'\ngain: min {min(gains):+.1f}, max {max(gains):+.1f} points over {len(gains)} runs'
          f' ({sum(g >= 10 for g in gains)} of {len(rows)} at least +10)')


if __name__ == '__main__':
  main()
