"""Fine-tuning both members of a pair on sequence classification and regression tasks: task
definitions and their settings (`tasks`), the run settings (`config`), the loop over a seed
sweep (`trainer`), metrics (`metrics`) and where results live (`results`); the examples are
read and encoded by `data_pipelines.task_data`."""
