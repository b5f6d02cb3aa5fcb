# A registry-free image: build the static binary first (make image does both).
#   CGO_ENABLED=0 go build -trimpath -o bin/hoard ./cmd/hoard
FROM scratch
COPY bin/hoard /hoard
ENTRYPOINT ["/hoard"]
CMD ["daemon", "--data-dir", "/data"]
