"""The attention tests: one file per kind of the registry (test_<kind>.py), the ALiBi option
(test_alibi.py), the options' validation (test_options.py), models mixing the kinds
(test_models.py) and the contract every registered kind meets (test_contract.py); shared helpers
in helpers.py. A package, so that pytest imports these as `attention.<name>` beside tests/."""
