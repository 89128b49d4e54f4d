"""Fine-tuning both members of a pair on sequence classification and regression tasks: task
definitions (`tasks`) and metrics (`metrics`); the examples are read and encoded by
`data_pipelines.task_data`."""
