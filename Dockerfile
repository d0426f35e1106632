# One image for every Python service: web (default CMD), worker, beat, migrate.
# CPU build:  docker build -t covid-cxr .
# GPU build:  docker build --build-arg TF_PACKAGE='tensorflow[and-cuda]==2.21.0' -t covid-cxr:gpu .
# The model is not baked in: docker-compose.yml mounts ./models at /app/models.
FROM python:3.11-slim

# Must equal the tensorflow-cpu pin in requirements.txt (tests/test_compose.py checks).
ARG TF_PACKAGE=tensorflow-cpu==2.21.0

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app app

WORKDIR /app

# Dependencies first so code changes do not reinstall TensorFlow.
COPY requirements.txt ./
RUN sed -i "s|^tensorflow-cpu==.*$|${TF_PACKAGE}|" requirements.txt \
    && grep -qxF "${TF_PACKAGE}" requirements.txt \
    && pip install -r requirements.txt

COPY . .

# instance/ is where Flask may write at runtime; the code itself stays root-owned.
RUN mkdir -p /app/instance /app/models \
    && chown app:app /app/instance

USER app

EXPOSE 8000

CMD ["sh", "-c", "exec gunicorn --bind 0.0.0.0:8000 --workers ${WEB_CONCURRENCY:-2} --timeout 60 'webapp:create_app()'"]
