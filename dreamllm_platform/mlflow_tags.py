"""The names of every MLflow tag the project sets or reads, on runs and on registered versions.

Owns: the tag names (plain strings; this module imports nothing). A tag is
written in one module and read in others (the training run's checkpoint URI
by the registry, the evaluation tags by the promotion gate), so both sides
import the name from here instead of spelling it.
"""

# ------------------------------------------------------------- on runs
RUN_NAME_TAG = "dreamllm.ray_run_name"
"""The Ray run name a training run was created for: a resubmitted job resumes the run that carries it."""
CHECKPOINT_URI_TAG = "dreamllm.checkpoint_uri"
"""The exported checkpoint (on a training run and on the version registered from it)."""
STAGE_TAG = "dreamllm.stage"
"""The training stage: align, igpt or sft (on a training run and on a version)."""
FLAVOR_TAG = "dreamllm.flavor"
"""The model flavor: debug, small or 7b (on a training run and on a version)."""
CONFIG_CHANGES_TAG = "dreamllm.config_changes"
"""JSON {key: [logged, now]} of the params a resumed run changed (MLflow params keep the first config)."""
TRACKING_OUTAGE_TAG = "dreamllm.tracking_outage"
"""JSON of the metric-logging outages a training run lived through (steps, metrics buffered and dropped)."""
JOB_TAG = "dreamllm.job"
"""The job that made a run, where it is not a stage (towers, ablation)."""
TOWERS_URI_TAG = "dreamllm.towers_uri"
"""Where the towers job wrote its folder (the diffusers decoder, vision/, llm/)."""
TOWERS_CONFIG_HASH_TAG = "dreamllm.towers_config_hash"
"""The hash of the towers job's settings: finished towers are reused only with the same settings."""
ABLATION_ARM_TAG = "dreamllm.ablation.arm"
"""The arm of an ablation child run."""
SFT_RUN_TAG = "dreamllm.sft_run"
"""The stage III run an ablation child run measured."""
MODEL_TAG = "dreamllm.model"
"""The model reference a learning-check run checked."""
MODEL_VERSION_TAG = "dreamllm.model_version"
"""The registered version an evaluation run evaluated."""
LEARNING_CHECK_MODEL_TAG = "dreamllm.learning_check.model"
"""The model reference of the learning check logged on a training run."""
LEARNING_CHECK_SETTINGS_TAG = "dreamllm.learning_check.settings"
"""The learning check's settings (JSON) logged on a training run."""

# -------------------------------------------------- on registered versions
REGISTERED_BY_TAG = "dreamllm.registered_by"
"""Who registered the version."""
CONTENT_DIGEST_TAG = "dreamllm.content_digest"
"""The sha256 of the version's checkpoint files (`storage.dir_digest`): where its weights are kept
(`<registry store>/<model>/sha256-<digest>`) and the serving cache's key."""
SOURCE_URI_TAG = "dreamllm.source_uri"
"""The checkpoint the version was registered from (a stage's output folder, which a rerun overwrites);
the version's `dreamllm.checkpoint_uri` is its immutable copy."""
EVAL_TAG_PREFIX = "dreamllm.eval."
"""`dreamllm.eval.<metric>`: the version's evaluation metrics (and `run_id`, `dataset`), which the gate reads."""
EVAL_SET_TAG = EVAL_TAG_PREFIX + "dataset"
"""The digest of the held-out set and settings an evaluation used: the gate compares like with like."""
MOVE_TAG_PREFIX = "dreamllm.move."
"""`dreamllm.move.NNNN`: a JSON record of an alias move to this version (who, when, from and to version,
metrics, digests, the gate's decision), written before the alias moves."""
PREVIOUS_CHAMPION_TAG = "dreamllm.previous_champion"
"""The champion before this version was promoted; rollback follows it."""
FORCE_REASON_TAG = "dreamllm.force_reason"
"""Why a promotion overrode the gate."""
GATE_TAG = "dreamllm.gate"
"""The gate's verdict (JSON) on this version."""
