#!/usr/bin/env bash
# The local Apache Kafka broker's jars, fetched once with Maven into .kafka/<version>/libs (ignored by git).
# Installs Debian's Java and Maven first when they are missing. A download that did not finish leaves no
# marker file, so the next run fetches again.
set -euo pipefail
cd "$(dirname "$0")/.."
POM=deploy/kafka/pom.xml
VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM")
LIBS=".kafka/$VERSION/libs"
MARKER=".kafka/$VERSION/COMPLETE"

if [ -f "$MARKER" ]; then
    exit 0
fi
if ! command -v java >/dev/null || ! command -v mvn >/dev/null; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends default-jre-headless maven
fi
rm -rf "$LIBS"
echo "fetching Apache Kafka $VERSION (org.apache.kafka:kafka_2.13 and its runtime dependencies) into $LIBS"
mvn -B -q -f "$POM" dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$PWD/$LIBS"
ls "$LIBS" > "$MARKER"
