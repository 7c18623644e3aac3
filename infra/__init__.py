"""Local infrastructure: Java artifacts from Maven, an embedded Kafka broker, a standalone
Flink cluster on loopback, and the Kafka client helpers the tools share."""
