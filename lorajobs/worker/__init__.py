"""The worker: a Celery consumer that claims a job under a lease and supervises the trainer
child process (`python -m lora_core run` or torchrun) until the job is settled.

    celery_app  the app, task registration, warm-shutdown hook
    tasks       run_job(job_id): claim or no-op
    supervisor  spawn, tail events, renew the lease, cancel/shutdown stop sequence
    prewarm     the pre-warmed trainer: fork single-process trainers from a zygote
    zygote      that zygote process (imports torch once; `python -m lorajobs.worker.zygote`)
    procs       process-lifetime helpers: PR_SET_PDEATHSIG, killpg, liveness
    runspec     job row -> RunSpec, paths, command, environment
    records     trainer events -> rows (events, metrics, checkpoints, artifacts)
    settle      exit + events -> succeeded | failed | cancelled | requeued
    repro       the reproducibility manifest
    reaper      expired leases and lost messages
    main        worker / beat / reaper entry points;  embedded: `serve`, all in one command

Never imports torch in the worker process: the trainer child and the zygote do.
"""
