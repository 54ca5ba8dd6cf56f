"""`python -m lora_core ...`: see lora_core.child_process. Leaves through `exit_now`: after a
run the interpreter's teardown of torch + a trained model took seconds on 2 cores
(bench/job_overhead_bench.py), and the worker waits for this exit before it settles the job."""

from lora_core.child_process import exit_now, main

if __name__ == "__main__":
    exit_now(main())
