FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY policies ./policies
RUN pip install --no-cache-dir .
ENV SLUICE_HOST=0.0.0.0 SLUICE_PORT=8080 SLUICE_CONFIG=/app/policies/default.yaml
EXPOSE 8080
ENTRYPOINT ["sluice"]
CMD ["serve"]
