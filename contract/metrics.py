"""Prometheus metric names exported by each component; the dashboard and alerts use only these."""

from __future__ import annotations

# Trainer (one endpoint per rank). Labels: job, rank.
TRAINER_LOSS = "aiaas_trainer_loss"
TRAINER_ACCURACY = "aiaas_trainer_eval_accuracy"
TRAINER_SAMPLES_PER_SECOND = "aiaas_trainer_samples_per_second"
TRAINER_STEP = "aiaas_trainer_step"
TRAINER_TOTAL_STEPS = "aiaas_trainer_total_steps"
TRAINER_EPOCH = "aiaas_trainer_epoch"
TRAINER_LAST_CHECKPOINT = "aiaas_trainer_last_checkpoint_timestamp_seconds"
TRAINER_CHECKPOINT_AGE = "aiaas_trainer_checkpoint_age_seconds"

# Model server. Labels: model, endpoint, status (requests), model (others).
SERVER_REQUESTS = "aiaas_server_requests"  # counter -> aiaas_server_requests_total
SERVER_LATENCY = "aiaas_server_request_duration_seconds"  # histogram
SERVER_BATCH_SIZE = "aiaas_server_batch_size"  # histogram
SERVER_MODEL_LOAD = "aiaas_server_model_load_seconds"  # gauge

# Operator.
OPERATOR_JOBS = "aiaas_operator_trainingjobs"  # gauge, label phase
OPERATOR_JOBS_CREATED = "aiaas_operator_trainingjobs_created"  # counter
OPERATOR_JOBS_SUCCEEDED = "aiaas_operator_trainingjobs_succeeded"  # counter
OPERATOR_JOBS_FAILED = "aiaas_operator_trainingjobs_failed"  # counter, label reason
OPERATOR_JOBS_RESTARTED = "aiaas_operator_trainingjobs_restarted"  # counter
OPERATOR_RECONCILE_DURATION = "aiaas_operator_reconcile_duration_seconds"  # histogram, label kind
OPERATOR_RECONCILE_ERRORS = "aiaas_operator_reconcile_errors"  # counter, label kind
OPERATOR_TIME_TO_RUNNING = "aiaas_operator_time_to_running_seconds"  # histogram
OPERATOR_INFERENCESERVICES = "aiaas_operator_inferenceservices"  # gauge, label phase
