"""The job's logic without Flink: pretraining, prequential evaluation and tuning."""
