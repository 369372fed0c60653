"""The launcher's SageMaker half: the API requests it builds (checked against botocore's service
models), the backend that sends them and waits, and the pieces SageMaker needs named for it (ECR
images, instance types, Debugger rules' images, CloudWatch logs, batch transform, Clarify)."""
