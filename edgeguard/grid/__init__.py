"""``edgeguard evaluate grid --config configs/grid-*.yaml --out DIR``: defenses x attacks x seeds against one victim.

A grid is one victim model (an existing bundle, or trained first from ``data``/``model``/``train`` sections), a list
of output defenses and a list of extraction attacks.  Any parameter of a defense or an attack may be a list, which
sweeps it (``{name: heuristic, params: {beta: [0.5, 0.9]}}`` is two defense points; several lists give their
product).  A cell is (defense point) x (attack point) x seed; the undefended victim (``none``) is always one of the
defense points, added when the config leaves it out, because every other point is read against it.

Work, in order:

1. the victim bundle (``OUT/victim/`` when trained; reused on a rerun with the same settings);
2. one ONNX export per defense point that still has cells to run, under ``OUT/artifacts/<key>/`` where ``key``
   hashes the victim and the defense spec (a finished export is a folder with ``export.json``; reused);
3. each pending cell runs :func:`edgeguard.attacks.extraction.extract` against its defense point's ONNX file (no
   surrogate bundle is kept) and its record is written atomically to ``OUT/cells/<cell_id>.json`` as soon as it
   finishes; ``cell_id`` hashes (victim sha256, full defense config, full attack config, seed, evaluation set), so
   a rerun recomputes only the cells whose file is missing;
4. ``grid.json`` (config, cells, summary rows: mean and std over seeds per defense point x attack point),
   ``grid.md`` (one table per attack point) and ``plots/*.png`` (per attack point: defender accuracy against
   surrogate accuracy and against fidelity, one series per defense, the undefended point starred).

Backends: ``local`` runs exports and cells in a ``spawn`` process pool of ``workers`` processes (one torch thread
each); ``workers=1`` runs them in this process.  ``ray`` (``pip install 'edgeguard[dist]'``) runs the same task
functions as Ray tasks (one CPU each); the run folder must then be on storage every Ray node can read and write.
Exports and cells that fail are reported in ``grid.json`` (the run then fails, exit 1) and retried on a rerun.
"""

from edgeguard.grid.config import AttackPoint, DefensePoint, GridConfig, GridVictimConfig, expand_sweep
from edgeguard.grid.report import render_markdown, summary_tables
from edgeguard.grid.run import GridResult, run_grid

__all__ = ["AttackPoint", "DefensePoint", "GridConfig", "GridResult", "GridVictimConfig", "expand_sweep",
           "render_markdown", "run_grid", "summary_tables"]
