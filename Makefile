# The two commands of the README. `.ci/run` runs exactly `make install test`.
.PHONY: install test run lint

# The package and its test tools, Debian's prometheus for the metrics integration test, and the local
# Apache Kafka broker's jars (Java and Maven from Debian when missing; fetched once into .kafka/).
install:
	pip install -e ".[test]"
	command -v prometheus >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; }
	scripts/fetch_kafka.sh

test:
	python -m pytest -q

run:
	fpocmh run

lint:
	ruff check . && ruff format --check .
