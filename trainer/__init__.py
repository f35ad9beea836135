"""The run's Trainer, assembled from the mixins of the packages below (see `trainer.sft_trainer`)."""
