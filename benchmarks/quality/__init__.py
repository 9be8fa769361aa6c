"""The pieces of `benchmarks/bench_quality.py`: tasks (data + prompt formats), the training / evaluation engine,
the methods compared, the lever sweep and the reports. `bench_quality.py` is the only entry point."""
