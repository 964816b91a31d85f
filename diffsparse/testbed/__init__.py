"""Training and evidence for the testbed model (the model and its pipeline live in `diffsparse.pipelines.testbed`).

- `diffsparse.testbed.data`: procedural clips of coloured shapes with the prompts that describe them.
- `diffsparse.testbed.train`: `python -m diffsparse.testbed.train --out DIR`, rectified flow on CPU, resumable; its
  `DIR/pipeline` folder is what ships as `diffsparse/pipelines/weights/testbed`.
- `diffsparse.testbed.evidence`: `python -m diffsparse.testbed.evidence` regenerates `docs/testbed/` (sample grid,
  loss curve, attention energy decay) from the shipped weights.
"""
