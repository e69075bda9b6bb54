# The two commands of the README, and a few conveniences. Everything runs through hack/*.sh.
.PHONY: demo test images lint crds cluster-up cluster-down

demo:  ## set up and train LeNet-5 on digits locally (no cluster)
	./hack/demo.sh

test:  ## set up and run every check and test (starts a local control plane)
	./hack/test.sh

images:  ## build the operator and trainer images (buildah, root; cached under ~/.cache/aiaas/images)
	./hack/images.sh build

lint:
	PATH="$$(./hack/setup.sh):$$PATH" sh -c 'ruff check . && ./hack/mypy.sh'

crds:  ## regenerate crds/ from the API models
	"$$(./hack/setup.sh)/aiaas" crds --write crds/ --reference docs/crd-reference.md
	"$$(./hack/setup.sh)/python" deploy/sync.py

cluster-up:
	./hack/cluster.sh up

cluster-down:
	./hack/cluster.sh down
