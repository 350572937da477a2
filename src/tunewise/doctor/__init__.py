"""The doctor: read a training curve, say what went wrong, with numbers, causes and config changes.

Never imports torch or transformers (a test enforces it), so `tunewise doctor` starts fast anywhere.

- curve.py        reads logs into a `Curve`: metrics.jsonl, trainer_state.json, TensorBoard events
- tool_logs.py    LLaMA-Factory's trainer_log.jsonl, Axolotl's output_dir and model card, config.json
- findings.py     `Finding` and `Fix`, findings.jsonl
- codes.py        the catalogue of finding codes and the rules' thresholds, as data
- advice.py       learning-rate bands, ranked causes and fixes, recovery's fix order
- watcher.py      `CurveWatcher`: feeds each point to the rule families below
- divergence.py   non-finite values (also hidden as 0.0), loss spikes and explosions (also in the first
                  steps, or past ln(vocab)), degradation without NaN, gradient-norm spikes and overflows
- progress.py     not falling, flat, oscillation without a trend
- masking.py      no trainable tokens, loss 0.0 with no gradient (nothing trained)
- overfitting.py  eval rising, train-eval gap, memorization, epoch drops, eval degradation, NaN eval
- memory.py       memory at step 1
- diagnose.py     the verdict, summary, evidence and checkpoint to keep; the text `tunewise doctor` prints
"""
