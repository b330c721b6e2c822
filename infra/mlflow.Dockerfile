# The MLflow tracking server image used by infra/mlflow.yaml: MLflow at the version the
# project pins (a test checks mlflow and boto3 against pyproject.toml), boto3 for the s3://
# artifact destination, and a PostgreSQL driver for the backend store.
#
#   docker build -f infra/mlflow.Dockerfile -t registry.example.com/dreamllm-mlflow:3.17.2 infra
FROM python:3.11-slim
RUN pip install --no-cache-dir mlflow==3.17.2 boto3==1.43.117 psycopg2-binary==2.9.13
# Not root: the Deployment also asks for runAsNonRoot.
RUN useradd --uid 1000 --create-home mlflow
USER 1000
WORKDIR /home/mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
