"""Step-time benchmark of plain training, LPA at every point and every registered method.

    python -m experiments.bench --out experiments/results/bench_cpu.json --check --repeats 5

Modules: :mod:`~experiments.bench.timing` (configurations, stand-in data, round-robin timer,
the cost model's pieces), :mod:`~experiments.bench.flops` (XLA FLOP counts, the cost model,
the FLOP check), :mod:`~experiments.bench.points` (the LPA grid's points),
:mod:`~experiments.bench.report` (rows, checks, tables) and :mod:`~experiments.bench.cli`.
Running the benchmark takes minutes, so its example is not run as a doctest:

>>> from experiments.bench import cli
>>> result = cli.main(["--quick", "--only", "plain,lpa", "--T", "1"])   # doctest: +SKIP
"""
