module vllm-operator.local/pause

go 1.26.0
