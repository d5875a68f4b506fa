"""The weights stage: fetch the model's files, prove every byte and the structure, record a verified manifest."""
