"""Training and evidence for the testbed model (the model and its pipeline live in `diffsparse.pipelines.testbed`).

- `diffsparse.testbed.data`: procedural clips of coloured shapes with the prompts that describe them.
- `diffsparse.testbed.train`: `python -m diffsparse.testbed.train --out DIR`, rectified flow on CPU, resumable; its
  `DIR/pipeline` folder is what ships as `diffsparse/pipelines/weights/testbed`.
- `diffsparse.testbed.evidence`: `python -m diffsparse.testbed.evidence` regenerates `docs/testbed/` (sample grid,
  loss curve, attention energy decay) from the shipped weights.
"""


def add_two_stage_options(parser, two_stage_help: str) -> None:
    """`--two-stage` and `--still-candidates`, the same flags wherever two-stage sampling is offered (`fidelity`,
    `evidence`, `diffsparse compare` and `eval`); see `diffsparse.pipelines.testbed.sample` and `best_still`."""
    from ..cli import at_least  # here: the CLI imports this module

    parser.add_argument("--two-stage", action="store_true", help=two_stage_help)
    # Checked when parsed: a plain int let 0 through to the config, refused only once the model had loaded.
    parser.add_argument("--still-candidates", type=at_least(1), default=1,
                        help="with --two-stage: still images sampled per prompt (seeds seed, seed+1, ...); each clip "
                        "starts from the one whose shape has the most room towards its direction word "
                        "(pipelines.testbed.room_ahead)")
