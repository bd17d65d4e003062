"""The evaluation suites beyond the test split: healthy volumes from packages (``external``), real
tumour patients (``patients``) and appearance shortcuts (``shortcuts``). They run a served model."""
