"""Reads a Kafka topic from the beginning and decodes every record with confluent-kafka's own
schema-registry deserializers (never outboxd's code): one JSON line per record,
{"id": <the record's `id` header>, "schema_id": <the id in the wire format>, "value": <decoded>}.

    confluent_decode.py BOOTSTRAP TOPIC REGISTRY_URL avro|json_schema COUNT TIMEOUT_S

Stops once COUNT distinct ids were decoded (then 1 s more, for repeats) or after TIMEOUT_S.
A record that does not decode is printed as {"id": ..., "error": ...}; a tombstone (no value)
as {"id": ..., "value": null}.
"""

import faulthandler
import json
import struct
import sys
import time
import traceback

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.schema_registry.json_schema import JSONDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext


def main():
    bootstrap, topic, registry, kind, count, timeout = sys.argv[1:7]
    count, timeout = int(count), float(timeout)
    # If it hangs anyway, say where before the test's `timeout` kills it.
    faulthandler.dump_traceback_later(max(timeout + 15, 1), exit=False)
    # The client's default is no timeout at all: a request the registry never answers (seen
    # once in CI) would hang the consumer; with one it fails and the client retries it.
    client = SchemaRegistryClient({"url": registry, "timeout": 10})
    # No reader schema: each record decodes with the writer's, fetched by the id it carries.
    if kind == "avro":
        deserialize = AvroDeserializer(client)
    else:
        deserialize = JSONDeserializer(None, schema_registry_client=client)
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"decode-{time.time_ns()}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    # Every partition from its beginning, without a consumer group (nothing to join or leave).
    deadline = time.monotonic() + timeout
    partitions = []
    while not partitions and time.monotonic() < deadline:
        meta = consumer.list_topics(topic, timeout=5).topics.get(topic)
        partitions = list(meta.partitions) if meta is not None and meta.error is None else []
        if not partitions:
            time.sleep(0.2)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    seen = set()
    done_at = None
    while time.monotonic() < deadline and (done_at is None or time.monotonic() < done_at):
        msg = consumer.poll(0.5)
        if msg is None or msg.error():
            continue
        headers = dict(msg.headers() or [])
        event_id = headers.get("id", b"").decode()
        raw = msg.value()
        line = {"id": event_id, "value": None}
        if raw and len(raw) >= 5 and raw[0] == 0:
            line["schema_id"] = struct.unpack(">I", raw[1:5])[0]
        try:
            # A tombstone (no value) stays empty.
            if raw is not None:
                ctx = SerializationContext(msg.topic(), MessageField.VALUE, msg.headers())
                line["value"] = deserialize(raw, ctx)
        except Exception as e:  # noqa: BLE001 - reported, the test fails on it
            line["error"] = f"{type(e).__name__}: {e} at {traceback.format_exc().strip().splitlines()[-3:]}"
        print(json.dumps(line, default=str), flush=True)
        seen.add(event_id)
        if len(seen) >= count and done_at is None:
            done_at = time.monotonic() + 1.0
    consumer.close()


if __name__ == "__main__":
    main()
