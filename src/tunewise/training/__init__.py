"""Training: the run, the live monitor, its callbacks, recovery, lr-find, samples and distributed helpers.

- run.py          `train`: setup, train (with recovery), save, record
- monitor.py      `WatchedTrainer` and `StepMonitor`: every optimizer step recorded and judged live
- callbacks.py    the small TrainerCallbacks: pause at a step, learning-rate reset, lr-find recorder
- recovery.py     after a divergence: the restart checkpoint and the next fix
- lrfind.py       the learning-rate range test
- samples.py      base vs tuned generations at the end of a run
- distributed.py  `is_main_process`, `world_size`
"""
