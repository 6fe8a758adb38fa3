"""The four stages, one module each, in the order data flows: instructions -> instances ->
outputs (one extra model at a time) -> ensemble. Each reads the previous stage's files and
appends its own, so any stage can be stopped and resumed."""
