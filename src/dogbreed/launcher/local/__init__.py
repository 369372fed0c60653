"""The launcher's local half: SageMaker re-created on this machine. Training jobs and tuning
studies (Optuna) in /opt/ml-layout work dirs, the multi-model endpoint (a router honouring
``TargetModel`` in front of the serve image's model server) and batch transform."""
