"""requant.orchestrator: the capture job, the control plane and the `requant` console script.

Capture job (`requant capture-job`, a control-plane capture job)
  spec.py          job specs of every kind (capture, quantize, evaluate): pydantic, one schema
                   for job files (``load_spec``), the API (``JobSpec``, discriminated on ``kind``)
                   and the runner (``parse_spec``); data-root confinement
  prompts.py       ``PromptConfig`` and the prompt source (hub dataset or local parquet/jsonl)
  job.py           ``CaptureJob``: reconcile, passes of the loop, coverage loop, status file
  pool.py          the replica pool: ``ReplicaState``, start / health / restart / stop
  capture_loop.py  the feed/drain loop: queue and workers, replicas that die, the drain
  feeder.py        the chat-completions client of one replica (outcomes for exactly-once)
  replica.py       one vLLM server with the capture plugin, owned by a Ray actor
  guard.py         the process guard that takes a server's whole process group down with it
  ledger.py        exactly-once bookkeeping: the store's prompt ids, the resumable ledger

Control plane (`requant api`)
  api.py           FastAPI: jobs, cancel, Prometheus /metrics; typed job records on disk
  runner.py        one job in its own process (``python -m requant.orchestrator.runner DIR``)
  records.py       atomic JSON files of jobs (records, results, progress)

Other commands
  evaluate.py      `requant evaluate`: MTP draft acceptance offline and in vLLM
  demo.py          `requant demo`: the whole pipeline on one CPU machine
  commands.py      the orchestrator's sub-commands; cli.py: the console script
  summary.py       plain-text tables of the CLI
"""
