"""The doctor: read a training curve, say what went wrong, with numbers, causes and config changes.

Never imports torch or transformers (a test enforces it), so `tunewise doctor` starts fast anywhere.

- curve.py        reads logs into a `Curve`: metrics.jsonl, trainer_state.json, TensorBoard events
- findings.py     `Finding` and `Fix`, findings.jsonl
- codes.py        the catalogue of finding codes and the rules' thresholds, as data
- advice.py       learning-rate bands, ranked causes and fixes, recovery's fix order
- watcher.py      `CurveWatcher`: feeds each point to the rule families below
- divergence.py   non-finite values, loss spikes and explosions, gradient-norm spikes
- progress.py     not falling, flat
- masking.py      no trainable tokens
- overfitting.py  eval rising, train-eval gap, memorization, epoch drops
- memory.py       memory at step 1
- diagnose.py     the verdict, summary, evidence and checkpoint to keep; the text `tunewise doctor` prints
"""
