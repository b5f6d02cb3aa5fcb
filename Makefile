# hoard — see README.md. Two commands matter: `make run` and `make test`.
GO      ?= go
BIN     ?= bin/hoard
DATA    ?= ./.hoard
export CGO_ENABLED ?= 0
# hoard --version prints these (git describe / rev-parse; dev outside git).
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT  ?= $(shell git rev-parse HEAD 2>/dev/null)

.PHONY: all build run test deps vet unit fuzz-short tour bench image testbed clean

all: build

build:
	$(GO) build -trimpath -ldflags "-X main.version=$(VERSION) -X main.commit=$(COMMIT)" -o $(BIN) ./cmd/hoard

# One node with embedded defaults: data under ./.hoard, API on 127.0.0.1:7480,
# NBD on ./.hoard/nbd.sock. No external service needed.
run: build
	./$(BIN) daemon --data-dir $(DATA)

# Installs the real tools the tests drive (qemu, libnbd, glance-api...) when
# missing, then vets and runs every test with the race detector, short fuzz
# runs, and the README's tour as written.
test: deps vet unit fuzz-short tour

deps:
	./scripts/install-test-deps.sh

vet:
	$(GO) vet ./...

unit:
	CGO_ENABLED=1 $(GO) test -race -timeout 25m ./...

# README's five-minute tour, run as written in a fresh copy (scripts/tour.sh).
tour:
	./scripts/tour.sh

# A count, not a duration: with a duration, a loaded machine can spend it all
# on the baseline corpus run and go test then fails with "context deadline
# exceeded" (seen in a CI-like run).
FUZZTIME ?= 10000x
fuzz-short:
	$(GO) test -run='^$$' -fuzz='^FuzzDecodeManifest$$' -fuzztime=$(FUZZTIME) ./chunkstore
	$(GO) test -run='^$$' -fuzz='^FuzzDecodeProfile$$' -fuzztime=$(FUZZTIME) ./chunkstore
	$(GO) test -run='^$$' -fuzz='^FuzzPutGet$$' -fuzztime=$(FUZZTIME) ./chunkstore
	$(GO) test -run='^$$' -fuzz='^FuzzDecodeRecord$$' -fuzztime=$(FUZZTIME) ./chunkstore
	$(GO) test -run='^$$' -fuzz='^FuzzDecodeEntry$$' -fuzztime=$(FUZZTIME) ./chunkstore
	$(GO) test -run='^$$' -fuzz='^FuzzHandshake$$' -fuzztime=$(FUZZTIME) ./nbd
	$(GO) test -run='^$$' -fuzz='^FuzzRequest$$' -fuzztime=$(FUZZTIME) ./nbd
	$(GO) test -run='^$$' -fuzz='^FuzzDecodeMessage$$' -fuzztime=$(FUZZTIME) ./p2p
	$(GO) test -run='^$$' -fuzz='^FuzzParseContentRange$$' -fuzztime=$(FUZZTIME) ./node/origin
	$(GO) test -run='^$$' -fuzz='^FuzzQcow2Header$$' -fuzztime=$(FUZZTIME) ./node/origin
	$(GO) test -run='^$$' -fuzz='^FuzzDecodeCatalog$$' -fuzztime=$(FUZZTIME) ./p2p

# A FROM scratch image of the static binary (no registry), and the
# three-node docker-compose testbed.
image: build
	docker-compose build

testbed:
	./scripts/testbed.sh up
	./scripts/testbed.sh check

bench:
	./scripts/bench-import.sh

clean:
	rm -rf bin
