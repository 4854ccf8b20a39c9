"""Reads a Kafka topic from the beginning and decodes every record with confluent-kafka's own
schema-registry deserializers (never outboxd's code): one JSON line per record,
{"id": <the record's `id` header>, "schema_id": <the id in the wire format>, "value": <decoded>}.

    confluent_decode.py BOOTSTRAP TOPIC REGISTRY_URL avro|json_schema COUNT TIMEOUT_S

Stops once COUNT distinct ids were decoded (then 1 s more, for repeats) or after TIMEOUT_S.
A record that does not decode is printed as {"id": ..., "error": ...}.
"""

import json
import struct
import sys
import time

from confluent_kafka import Consumer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.schema_registry.json_schema import JSONDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext


def main():
    bootstrap, topic, registry, kind, count, timeout = sys.argv[1:7]
    count, timeout = int(count), float(timeout)
    client = SchemaRegistryClient({"url": registry})
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
    consumer.subscribe([topic])
    seen = set()
    deadline = time.monotonic() + timeout
    done_at = None
    while time.monotonic() < deadline and (done_at is None or time.monotonic() < done_at):
        msg = consumer.poll(0.5)
        if msg is None or msg.error():
            continue
        headers = dict(msg.headers() or [])
        event_id = headers.get("id", b"").decode()
        raw = msg.value() or b""
        line = {"id": event_id}
        if len(raw) >= 5 and raw[0] == 0:
            line["schema_id"] = struct.unpack(">I", raw[1:5])[0]
        try:
            ctx = SerializationContext(msg.topic(), MessageField.VALUE, msg.headers())
            line["value"] = deserialize(raw, ctx)
        except Exception as e:  # noqa: BLE001 - reported, the test fails on it
            line["error"] = f"{type(e).__name__}: {e}"
        print(json.dumps(line), flush=True)
        seen.add(event_id)
        if len(seen) >= count and done_at is None:
            done_at = time.monotonic() + 1.0
    consumer.close()


if __name__ == "__main__":
    main()
