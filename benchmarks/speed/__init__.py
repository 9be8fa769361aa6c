"""bench_speed's pieces (the script `benchmarks/bench_speed.py` is the command line over them).

- ``config``: method names, targets, references and the `Settings` of a run.
- ``zoo``: the models under test around one frozen base (`build_zoo` -> `Zoo`), and `Zoo.configure`, which puts the
  shared base in the state one method's run needs (gradient checkpointing on or off).
- ``work``: inputs (random ids, the system-prompt request), the timed work (train step, prefill, generate), the tasks
  and groups of a run (`plan`) and the run itself (`run`: instrumented warm-up, interleaved rounds).
- ``summary``: ratios round by round against each reference (`ratios`), the issue's targets (`check_targets`), the
  headline ratios two runs must agree on (`headline`, `agreement`).
- ``output``: markdown tables, the plot, the README section (`write_outputs`).
- ``profiling``: torch.profiler tables of several methods side by side (`profile`).
"""
