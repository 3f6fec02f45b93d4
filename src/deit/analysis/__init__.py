"""What the class and distillation tokens learned: agreement between predictors, token similarity, attention."""
